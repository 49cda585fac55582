"""The device side: packed format, expert store/cache, HEBF scheduler, model assembly, generation."""
