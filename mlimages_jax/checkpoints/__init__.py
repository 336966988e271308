"""The spine's checkpoint: Orbax train state with its metadata, inference checkpoints, import of the original TF checkpoints."""
