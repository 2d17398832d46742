"""Conversations and images on disk: SQLite history and a content-addressed image store. No Qt here."""
