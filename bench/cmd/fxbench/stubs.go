package main

func fashionMain([]string) error { return nil }
func reportMain([]string) error  { return nil }
