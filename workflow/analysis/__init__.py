"""Analysis: parameter trajectories, their 2D/3D projections, interplay metrics and plots."""
