"""Synthetic native Arabic stories from an LLM, TinyStories style: prompts (`prompts`), checks
and de-duplication (`validate`), and the resumable, concurrent generation loop (`run`)."""
