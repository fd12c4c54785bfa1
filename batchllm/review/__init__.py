"""Human review of a labeling output (``batchllm review``): which rows to show, and the tasks
and labeling config an annotation tool (Label Studio) shows them with."""
