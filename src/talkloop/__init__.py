"""talkloop: an open, self-hostable full-stack platform for AI characters."""

__version__ = "0.1.0"
