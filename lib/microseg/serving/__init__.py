"""What people and tools read: console reports, the HTML report, the SQL catalog."""
