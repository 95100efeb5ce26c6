"""Attention backends behind one interface (see `base.py`). The torch backend is the reference."""
