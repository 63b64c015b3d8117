"""The stateless draft service: a small model proposing K tokens; any replica serves any round."""
