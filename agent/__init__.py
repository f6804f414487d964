"""dashcar's agent: the local daemon that stores every frame and writes the ML-Dash layout.

Run it with ``dashcar agent`` or ``python -m dashcar.agent``; importing this package
starts nothing.
"""
