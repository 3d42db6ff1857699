"""Engine integrations (DESIGN.md §7b): adapters above the engine API; nothing in flexkv imports them."""
