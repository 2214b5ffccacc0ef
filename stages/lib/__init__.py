"""Logic shared by the stages: parameters, files, dataset, model runners, metrics."""
