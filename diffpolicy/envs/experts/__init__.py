"""Experts that produce demonstrations: scripted controllers and learned policies, built from task cards."""
