"""What the app serves to browsers: the offline API docs, static assets and their security headers."""
