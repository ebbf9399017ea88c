"""The ground floor: the typed contract (errors, ModelSpec, BuildManifest and its stage records, RepositoryIndex), where yqpack's
files and state live, atomic folder swaps. Standard library only; imports nothing else of yqpack."""
