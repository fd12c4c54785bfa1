"""Other ways in and out of a job: OpenAI batch files (openai_batch.py)."""
