"""Pretraining with Lightning: the LightningModule (pretraining), its loss and optimisers, the
plateau metric, checkpointing a run, preemption and non-finite steps, the console, throughput
and MFU, the precision chosen when unset, the curves of a run."""
