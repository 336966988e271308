"""The spine's results: exact metrics and the streaming, multi-host evaluation of a checkpoint."""
