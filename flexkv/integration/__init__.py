"""Engine integrations (DESIGN.md §7b). They sit above the engine API; nothing in flexkv imports them."""
