"""The billing example's Django project: settings only, since it serves no pages."""
