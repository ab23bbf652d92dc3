"""The MedLSAM Segment Editor effect (registered by the MedLSAM module at startup)."""
