"""Zeroth-order optimisation (ZOPrO): the direction on flat buffers, its engines and the trainer hook."""
