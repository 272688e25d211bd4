"""The bottom layer: the user-error type, atomic file writes, the console and figures. Imports no other layer."""
