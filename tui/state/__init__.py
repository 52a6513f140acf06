"""What the terminal UI knows and computes without Textual: runs' files, the dashboard's text, settings,
the chat's model holder. Screens render it; an import contract keeps textual out of this package."""
