"""The pieces of `mechlora.train`, one job per module (see mechlora/train.py for the map)."""
