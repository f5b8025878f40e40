"""CrIBo: Cross-Image Object-Level Bootstrapping (ICLR 2024), pretraining and backbones."""
