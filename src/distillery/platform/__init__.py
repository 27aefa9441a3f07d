"""MLOps plumbing, paper-agnostic: each external system behind one small module."""
