"""Small shared helpers: atomic file writes, timing, environment facts."""
