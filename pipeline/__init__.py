"""The batch job's dataflow as Ray Data stages: read, validate, infer, write."""
