"""The site layer: file-system routes in both styles, normalised into one Route."""
