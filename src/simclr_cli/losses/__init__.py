"""Losses: NT-Xent and the Table 4 variants, with negatives gathered across processes."""
