from uctr_batch.cli import entry

entry()
