"""The chaos suite: random clients, random kill -9s, and a checker of every promise afterwards."""
