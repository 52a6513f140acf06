"""The SAMI loop: sampling, scoring, the objective's step, adapters, run state, ranks and the monitor."""
