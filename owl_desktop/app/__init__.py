"""Use cases without Qt (chat, settings); the GUI drives them from its worker threads."""
