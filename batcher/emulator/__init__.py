"""batcher's built-in DashScope emulator."""
