"""The core every compressor builds on: interface, budgets, slots and their accounting, attention,
top-k, relaxations, the registry, the teacher-forced driver and the generation policy."""
