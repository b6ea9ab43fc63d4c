"""Tasks: what is trained on what data, plugged into the one engine in ``training``."""
