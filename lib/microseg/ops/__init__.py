"""Operations on the whole lake: erasure (`microseg forget`) and upkeep (`microseg maintain`)."""
