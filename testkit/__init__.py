"""Test helpers: tiny real HF model folders, PEFT adapters and sample data."""
