"""The embedded world: procedural captioned images, the small CLIP recipe, few-shot tasks."""
