"""Stage 3, packed Arrow to checkpoint: YAML to settings, the torch and MindSpore backends, the MindFormers run and its compatibility shims, HF <-> MindFormers conversion, parity."""
