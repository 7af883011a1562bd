"""Using a trained model: predictions on image files, from a run folder or an exported SavedModel."""
