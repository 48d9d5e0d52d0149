"""LoginService's feature: phone numbers, verification codes and their SMS providers, users."""
