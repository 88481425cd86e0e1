"""Fine-tuning for sequence classification, mirroring pretraining: task tables (table), their
LightningDataModule (datamodule), the LightningModule (classifier), prediction (predict)."""
