"""MedSR: reproducible super-resolution for chest X-ray, CT and brain MRI."""

__version__ = "0.1.0"
