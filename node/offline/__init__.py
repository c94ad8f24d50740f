"""Commands that run without a node: phantom studies, training, the demo."""
