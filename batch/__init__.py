"""Ray Data jobs and command-line tools that share the serve_app domain."""
