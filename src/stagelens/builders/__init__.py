"""What builds checkpoints: tiny test models (tiny), the embedded model's assembly (embedded),
projector training and the SmolLM2 export. Every write goes through `stagelens.atomic.atomic_path`."""
