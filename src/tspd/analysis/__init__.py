"""Analysis of decompositions: metrics, and (later) circuit census, baselines and ablation studies."""
