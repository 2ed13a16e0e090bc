"""The training and evaluation run of CLIP4Clip under main_task_retrieval.py, one module per concern."""
