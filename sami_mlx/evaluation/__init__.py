"""Judging a run: pairwise win rates against the base model and the judges that decide them."""
