"""ftctl.recovery"""
